"""The one error type of the conversion code."""


class ConversionError(ValueError):
    """A Hugging Face directory or a checkpoint does not fit the model; the message names the
    tensor, file or config field at fault, in one line."""
