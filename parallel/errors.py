"""The one base class of every error foldtron reports to its user as one line.

Bad input (a config, a layout, a dataset, a checkpoint, a tokenizer file) raises a subclass of
`FoldtronError` with a message that names the field and the fix. The command-line entry points
catch this one type (and OSError, the operating system's word on a file) and print the message;
anything else is a bug and keeps its traceback. A leaf module without imports: `data` imports it
too, the one thing it takes from `parallel`.
"""


class FoldtronError(Exception):
    """Bad input, explained in the message."""
