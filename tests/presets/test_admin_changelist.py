URL = "/admin/presets_app/steeringpreset/"


def test_it_lists_presets_for_staff(login, staff, make_preset):
    make_preset(name="starred", is_favorite=True)
    make_preset(name="plain")

    response = login(staff).get(URL)

    assert response.status_code == 200
    assert {preset.name for preset in response.context["cl"].result_list} == {"starred", "plain"}


def test_it_searches_name_and_description(login, staff, make_preset):
    make_preset(name="rain dance")
    make_preset(name="other", description="brings RAIN")
    make_preset(name="sunny")

    response = login(staff).get(URL, {"q": "rain"})

    assert {preset.name for preset in response.context["cl"].result_list} == {"rain dance", "other"}


def test_it_filters_by_favorite(login, staff, make_preset):
    make_preset(name="starred", is_favorite=True)
    make_preset(name="plain")

    response = login(staff).get(URL, {"is_favorite__exact": "1"})

    assert [preset.name for preset in response.context["cl"].result_list] == ["starred"]


def test_it_sends_members_to_the_admin_login(login, teammate):
    response = login(teammate).get(URL)

    assert response.status_code == 302 and "/admin/login/" in response.url


def test_it_sends_anonymous_users_to_the_admin_login(client):
    assert client.get(URL).status_code == 302
