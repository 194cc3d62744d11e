"""The engine contract, one suite run against every engine."""
