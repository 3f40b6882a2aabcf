#include "h.h"
int f(void) { return V; }
