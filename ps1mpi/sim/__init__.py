"""The simulated survey: sky, camera signatures, detrend masters, reference catalog, truth.

Modules: ``survey`` (:func:`~ps1mpi.sim.survey.simulate_survey`, MPI by chip), ``plan`` (presets
and the exposure plan), ``sky`` (stars, galaxies, transients, moving objects), ``psf`` (PSF and
rendering), ``instrument`` (camera signatures, the detector), ``artefacts`` (cosmic rays,
bleeding, ghosts, glints, spikes, crosstalk), ``exposure`` (one exposure, chip by chip),
``detrend`` (calibration frames and masters), ``catalogs`` (reference catalog and truth tables),
``datastore`` (the HTTP datastore serving the raw data). See ``docs/sim.md``.
"""
