from sftpipe.components.tokenize.component import tokenize

__all__ = ["tokenize"]
