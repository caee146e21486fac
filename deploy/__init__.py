"""Deployment outside PyTorch: ``export.py``'s work, one concern per module.

- :mod:`deploy.export_onnx`: the export-ready network (BN fused, SKA on standard operators, ``logits`` and
  ``features`` outputs), the ONNX export, the probe images, the onnxruntime-vs-PyTorch comparison, ``reference.json``.
- :mod:`deploy.quantize`: int8 static quantization (onnxruntime QDQ, per-channel) and its speed/agreement report.
- :mod:`deploy.exporter`: a model folder or checkpoint -> a verified deployment folder (ONNX, safetensors or both).
- :mod:`deploy.engine`: ``--engine auto|torch|onnx``: a model folder exported once into the engine cache and run with
  onnxruntime on the CPU (``predictor.load_model_bundle``).
- :mod:`deploy.onnx_folder`: the ONNX half of that folder (written, verified, ``reference.json``, ``int8/``); it is
  the only part that needs onnx and onnxruntime.

Running an exported folder is :mod:`inference.onnx_model`'s business (torch-free); its files are described by
:mod:`artifacts.config_file` and :func:`artifacts.model_folder.build_export_config`.
"""
