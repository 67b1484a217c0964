"""The names a DTL model is built from: the methods :func:`~dtl_kernels.create_model`
takes, the head modes of the wrappers and the limits of its sizes. One place for each,
below everything that checks them (the wrappers, the factory, the adapter schema,
dtl-train's options)."""

METHODS = ("dtl", "dtl+", "dtl+*", "linear", "lora", "full")
HEAD_MODES = ("published", "backbone")

# Sane limits of a model's sizes (also of adapter metadata and dtl-train's options): far
# beyond any real model, they keep every product of sizes sane before anything is allocated.
LIMITS = {"num_classes": 2**24, "rank": 2**16, "tap_from": 2**16, "adapt_from": 2**16,
          "conv_kernel": 2**10, "lora.rank": 2**16, "lora.blocks": 2**16}  # fmt: skip
