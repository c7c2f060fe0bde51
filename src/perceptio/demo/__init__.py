"""The web demo (``perceptio demo``): :mod:`perceptio.demo.render` draws what one prediction shows (no web
framework needed); :mod:`perceptio.demo.app` builds the Gradio page (``pip install perceptio[demo]``)."""
