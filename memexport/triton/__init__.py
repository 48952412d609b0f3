"""Triton Inference Server model repositories from memexport artifacts (``memexport triton-repo``).

* :mod:`~memexport.triton.artifacts`: what a repository needs to know about an artifact, read from it;
* :mod:`~memexport.triton.writer`: :func:`~memexport.triton.writer.triton_repo_from_artifacts` writes
  a repository;
* :mod:`~memexport.triton.check`: :func:`~memexport.triton.check.check_triton_repo` checks one offline.
"""
