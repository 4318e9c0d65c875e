"""The one exception type whose message is shown to the user as is (one line, no traceback)."""


class GemmaChatError(Exception):
    pass


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download: the cache keeps the files that completed, the next run
    fetches the rest."""
