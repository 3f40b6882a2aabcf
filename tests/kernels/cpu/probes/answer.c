int f(void) { return 41 + 1; }
