"""Pieces shared by the layer families: nn modules, inner-loop maths, the state tree and the Mixer
contract, the generic token-by-token reference."""
