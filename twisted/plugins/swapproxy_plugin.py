from twisted.application.service import ServiceMaker

swapproxy = ServiceMaker(
    "swapproxy",
    "swapproxy.tap",
    "On-demand model-swapping proxy for local LLM servers",
    "swapproxy",
)
