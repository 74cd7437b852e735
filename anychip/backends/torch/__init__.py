"""The torch backends (cpu, cuda, neuron, neuron-xla): one shared base driven by a traits
record (``base``), one engine (``engine``) with its non-finite guards (``guards``), DDP/FSDP
(``parallel``), the training state (``state``), and one small module per device."""
