"""KFP components of sftpipe: one folder each, a thin `@dsl.component`
over `sftpipe.kfp_glue.steps`.

Every component's non-artifact inputs are config fields (`sftpipe.config`) without defaults:
the pipeline passes them all, so defaults live in one place.
"""
