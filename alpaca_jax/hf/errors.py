"""The one error type of the conversion code."""

from alpaca_jax.errors import UserError


class ConversionError(UserError, ValueError):
    """A Hugging Face directory or a checkpoint does not fit the model; the message names the
    tensor, file or config field at fault, in one line."""
