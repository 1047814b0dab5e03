"""Test and benchmark helpers shipped with the package: synthetic slides, tiny models, contract checks."""
