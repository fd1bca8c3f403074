"""The contract's error type (its own module so every contract module can raise it)."""


class ContractError(ValueError):
    """A model or its metadata does not follow the contract; the message says what and where."""
