"""One readable training loop per stage, plus the pieces they share."""
