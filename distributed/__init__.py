"""Scale-out: scoring collections beyond one machine on existing engines (Ray Data).

A pipelines-layer package: it uses :mod:`memexport.runtime` and never ``export`` or
``calibration``. Ray is optional (``pip install 'memexport[ray]'``) and imported lazily.
"""
