"""sftpipe: supervised fine-tuning as a production pipeline.

clean -> tokenize -> finetune -> evaluate -> register, each stage an importable module under
`sftpipe.stages` that runs without Kubeflow; `sftpipe.components` wraps them as KFP components
and `sftpipe.pipelines` wires them.
"""

__version__ = "0.1.0"
