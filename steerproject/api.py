from ninja import NinjaAPI

api = NinjaAPI(title="SteerLab API", version="1.0", urls_namespace="api")
