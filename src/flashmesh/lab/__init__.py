"""The proof environment: a real control plane built from Go modules, and (later) the VM lab.

Used by the tests, the demo and the benchmarks; the product's own modules never import it.
"""
