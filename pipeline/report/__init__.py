"""Reports: a trial's folder (``trial``), the study page (``study_summary`` → ``study_page``), the
Reruns section (``reruns``), the figures they embed (``figures``) and their HTML (``html``)."""
