"""DeepSpeed templates (``zero2.json``, ``zero3.json``, ``zero3_offload.json``), shipped as package data
so that a non-editable install finds them (``trainer.config`` reads them with ``importlib.resources``).
Batch sizes and precision are filled in from the trainer config in code, never here."""
