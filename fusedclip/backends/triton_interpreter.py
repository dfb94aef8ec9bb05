"""Two adaptations of Triton's interpreter (``TRITON_INTERPRET=1``), applied when the Triton
backend's kernels were defined under it. Neither changes what a kernel computes.
"""

from __future__ import annotations

from types import ModuleType


def adapt_interpreter(kernels: ModuleType) -> None:
    """Apply both adaptations (idempotent)."""
    _fix_interpreter_loop_bounds()
    _speed_up_interpreted_helpers(kernels)


def _fix_interpreter_loop_bounds() -> None:
    """Let Triton's interpreter take loop bounds from kernel arguments under NumPy >= 2.4.

    Triton <= 3.6's interpreter turns a scalar into a Python int with ``int(array of shape (1,))``,
    which NumPy 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172). Its per-launch patch
    of ``tl.tensor.__index__`` is wrapped so the scalar is taken out of the array first.
    """
    import numpy
    from triton.runtime import interpreter

    try:
        int(numpy.ones(1))
        return  # this NumPy still converts size-1 arrays: nothing to fix
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor
    if getattr(original, "fusedclip_fix", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:  # noqa: ANN001 - mirrors triton's private signature
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.fusedclip_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


def _speed_up_interpreted_helpers(kernels: ModuleType) -> None:
    """Stop the interpreter from re-patching ``triton.language`` on every call of a helper.

    Each call of a ``@triton.jit`` helper inside an interpreted kernel re-applies the interpreter's
    patch of ``triton.language`` (an ``inspect.getmembers`` walk, milliseconds), although the launch
    already applied it to those same, process-wide module objects. For this module's helpers,
    called only from its kernels, the repetition is skipped (interpreted launches run about twice
    as fast).
    """
    from triton.runtime.interpreter import InterpretedFunction, InterpreterError

    class _HelperCall(InterpretedFunction):
        def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
            try:
                return self.rewrite()(*args, **kwargs)
            except Exception as error:
                raise InterpreterError(repr(error)) from error

    launched = {kernels.norm_kernel, kernels.scale_kernel, kernels.clamp_kernel}
    for value in vars(kernels).values():
        if type(value) is InterpretedFunction and value not in launched:
            value.__class__ = _HelperCall
