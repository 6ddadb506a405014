"""Scoring through Iskander from data-processing engines (docs/scale-out.md).

``iskander.integrations.ray.predict`` (Ray Data) and ``iskander.integrations.spark.predict``
(Spark ``mapInArrow``) append a model's outputs to every row of a dataset, either through
Iskander servers (``server=``: one location or several replicas) or with the model loaded in each
worker (``config=``, ``iskander.embedded``). Like the client, these modules stand apart from the
server: they import ``iskander.client`` and ``iskander.embedded`` only, and ``ray`` / ``pyspark``
only when their function is called (extras ``iskander[ray]``, ``iskander[spark]``).
"""
