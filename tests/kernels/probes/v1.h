#define V 1
