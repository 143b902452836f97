from sftpipe.components.clean.component import clean, data_digest

__all__ = ["clean", "data_digest"]
