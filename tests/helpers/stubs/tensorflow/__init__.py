"""A stand-in for ``tensorflow``, for ``hearvalidator`` (installed with ``pip install --no-deps``).

``hearvalidator.validate`` imports tensorflow at the top but, for a PyTorch model, only
tests ``isinstance(model, tf.Module)`` (False here: nothing is a stub Module) and never
reaches ``tf.device`` or ``tf.random`` (its TensorFlow-model branch). Anything else that
reaches for tensorflow through this stub fails loudly instead of passing by accident.
"""

__version__ = "0.0.0+stub"


class Module:
    """Nothing is an instance: a torch model is never taken for a TensorFlow one."""


def device(name):  # noqa: ARG001 - the TensorFlow-model branch only
    raise NotImplementedError("tests/helpers/stubs/tensorflow: tf.device is not stubbed (TensorFlow models only)")


def __getattr__(name):
    raise AttributeError(f"tests/helpers/stubs/tensorflow has no {name!r}: the validator reached TensorFlow code")
