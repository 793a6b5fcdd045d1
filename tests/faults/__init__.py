"""Fault-injection helpers: a real district stack (broker, mail sink, services as processes)."""
