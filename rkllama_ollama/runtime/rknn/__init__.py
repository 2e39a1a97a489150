"""ctypes binding of librknnrt (the RKNN runtime) for vision encoders: abi.py (struct layouts and
signatures), library.py (find and open the library), encoder.py (a resident encoder context)."""
