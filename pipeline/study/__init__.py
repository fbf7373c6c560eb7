"""The drivers: one trial's life (``trial``), workers sharing a study (``workers``), trials trained
as one population (``population``), the pre-study gradient check (``gate``) and the study run
(``run``). Each imports only from the floors below it: stages, storage, tracking, signals, report."""
