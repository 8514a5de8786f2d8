"""Data-aware fits: a layer's factors chosen to minimize its output error on the calibration statistics.

    data_aware     the base ``LayerFactorizer`` and the SVD family's fits (svd, spatial_svd, tucker2, channel_svd)
    nested         spatial_svd's and tucker2's refit products with a nested basis F (x) I_J, grown per rank
    taps           fits over a fixed basis of the patch space (shift, sal, dictionary)
    registry       method name -> fit (``layer_factorizer``): the one place both tables meet

May import: ``convfactor.methods`` (to build the factorized modules), the core, and ``auto.statistics``.
"""

__all__: list[str] = []
