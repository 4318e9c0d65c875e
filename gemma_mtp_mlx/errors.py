"""The one exception type whose message is shown to the user as is (one line, no traceback)."""


class GemmaChatError(Exception):
    pass
