"""Reports: a trial's folder (``trial``), the study page (``study_summary`` → ``study_page``), the
Reruns section (``reruns``) and the figures they embed (``figures``). Every page is a Jinja2
template under ``templates/`` (autoescaped), rendered by ``html.render`` from a small frozen context."""
