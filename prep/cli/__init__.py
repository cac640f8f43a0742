"""Thin click commands for the prep stages: parse options, call the stage, print the result."""
