"""FX graph passes on the post-grad aten graph (installed as quanto_fx.passes).

The rewrite rules arrive with the torch.compile backend work.
"""
