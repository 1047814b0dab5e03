"""(stub) the TAESD-family architecture, e.g. TAEF2 weights."""
