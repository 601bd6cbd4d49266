"""Benchmarks of runledger and of the designs it is compared with."""
