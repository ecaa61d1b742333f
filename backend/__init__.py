"""The torch.compile backend (installed as quanto_fx.backend).

Arrives with the torch.compile backend work.
"""
