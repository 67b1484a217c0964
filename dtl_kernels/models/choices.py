"""The names a DTL model is built from: the methods :func:`~dtl_kernels.create_model`
takes and the head modes of the wrappers. One place for both, below everything that
checks them (the wrappers, the factory, the adapter schema)."""

METHODS = ("dtl", "dtl+", "dtl+*", "linear", "lora", "full")
HEAD_MODES = ("published", "backbone")
