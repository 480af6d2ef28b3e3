"""The retrieval model (`model.RetrievalModel`: query path, loss, search, ranking) and `avg-jax retrieve`."""
