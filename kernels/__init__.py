"""Triton kernels and their plain-torch references (token matching arrives with the AsymRnR pass)."""
