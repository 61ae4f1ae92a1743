"""The one exception type users see: the CLI prints it as one line and exits with code 2."""


class T2TViTError(Exception):
    """A problem with the user's input (model name, file, data, configuration).

    The message is a complete sentence that says what is wrong and, where possible, how to fix it.
    """

    exit_code = 2
