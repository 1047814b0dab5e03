"""(stub) the project's own model + its packaged weights."""
