/* placeholder */ int tv_abi_version(void) { return 0; }
