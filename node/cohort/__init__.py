"""Research cohorts from an archive: query it for matching studies (a manifest), then fetch them.

``filters`` says which studies and series match, ``manifest`` reads and writes the cohort list,
``query`` asks the archive (C-FIND), ``targets`` says where fetched instances land and what is
already there, and ``fetch`` retrieves (C-MOVE, C-GET or DICOMweb) with retries and resumption.
"""
