from sftpipe.components.clean.component import clean

__all__ = ["clean"]
