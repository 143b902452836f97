from sftpipe.components.register.component import register

__all__ = ["register"]
