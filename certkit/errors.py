"""The errors certkit raises on bad input. The CLI prints them as one line, exit code 2."""


class CertkitError(Exception):
    """Base class: a problem with the user's input that certkit explains in one line."""


class UnsupportedOperator(CertkitError):
    """A network contains an operator that certkit has no sound bound rule for."""

    def __init__(self, node: str, op_type: str, detail: str = ""):
        self.node = node
        self.op_type = op_type
        msg = f"unsupported operator {op_type!r} at node {node!r}"
        super().__init__(msg + (f": {detail}" if detail else ""))


class InvalidModel(CertkitError):
    """A model file that cannot be read or converted."""


class InvalidInput(CertkitError):
    """Input arrays, shapes or options that do not fit the model or each other."""
