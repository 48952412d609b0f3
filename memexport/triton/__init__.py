"""Triton Inference Server model repositories from memexport artifacts (``memexport triton-repo``).

* :mod:`~memexport.triton.artifacts`: what a repository needs to know about an artifact, read from it;
* :mod:`~memexport.triton.schema`: Triton's own ``ModelConfig`` message and its text format, imported
  lazily (the ``triton`` extra), the one schema the writer and the checker share;
* :mod:`~memexport.triton.writer`: :func:`~memexport.triton.writer.triton_repo_from_artifacts` writes
  a repository, its configs built as ``ModelConfig`` messages;
* :mod:`~memexport.triton.check`: :func:`~memexport.triton.check.check_triton_repo` checks one offline.
"""
