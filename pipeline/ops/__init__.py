"""Operations on studies that already exist: scheduled reruns (``rerun``, ``drift``) and their schedule."""
