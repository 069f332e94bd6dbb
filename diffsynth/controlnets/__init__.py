"""ControlNet helpers: condition-image annotators (`processors.Annotator`)."""
